"""`gemma4-operator` (or `python -m gemma4_operator`): run the operator, or print its CRD.

    gemma4-operator                          # all namespaces, standalone (a single replica)
    gemma4-operator -n serving -n staging    # only these namespaces
    gemma4-operator --peering gemma4         # several replicas, one active: kopf peering (the Helm chart)
    gemma4-operator --liveness http://0.0.0.0:8080/healthz
    gemma4-operator crd > crd.yaml           # the CustomResourceDefinition

Credentials: in-cluster service account, else the kubeconfig ($KUBECONFIG).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gemma4-operator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=("run", "crd"), default="run")
    parser.add_argument("-n", "--namespace", dest="namespaces", action="append", default=[],
                        help="watch this namespace (repeatable; default: all namespaces)")
    parser.add_argument("--peering", metavar="NAME",
                        help="coordinate replicas through this KopfPeering object (default: standalone)")
    parser.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    parser.add_argument("--liveness", metavar="URL", help="serve kopf's liveness probe at this URL")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "crd":
        from gemma4_operator.crd import crd_yaml

        sys.stdout.write(crd_yaml())
        return

    import kopf

    import gemma4_operator.handlers  # noqa: F401 - registers the handlers

    kopf.configure(verbose=args.verbose)
    kopf.run(
        clusterwide=not args.namespaces,
        namespaces=args.namespaces,
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness,
    )


if __name__ == "__main__":
    main()
