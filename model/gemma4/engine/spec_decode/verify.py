"""Verifying draft tokens against the target's samples.

A request with k drafts d_0..d_{k-1} samples k + 1 rows in one forward: row j is the target's token for
the position after its tokens and d_0..d_{j-1}. Drafts are the drafter's argmax (or an n-gram's copy),
a point mass q, for which the standard rejection-sampling rule (accept d_j with probability
min(1, p(d_j) / q(d_j)) = p(d_j), else draw from the residual max(p - q, 0), i.e. p without d_j) is
exactly: draw t_j from p and accept d_j iff t_j == d_j, keeping t_j at the first mismatch. So the kept
tokens are t_0..t_a, where a is the first j with t_j != d_j (or k): each is a draw of the target's own
distribution given the tokens before it, greedy or sampled; with a seed, the very draws the request
would make without speculation (a draw depends on the seed, the output index and the row's logits).
"""

from __future__ import annotations

from dataclasses import dataclass

from gemma4.engine.request import Request
from gemma4.engine.sampler import SampleResult


@dataclass(frozen=True)
class Verified:
    """One sampling request's outcome: the rows it keeps (accepted drafts and the token after them),
    and the index in the step's sampling rows of its last kept row (whose hidden state precedes the
    last kept token)."""

    request: Request
    kept: list[SampleResult]
    last_row: int

    @property
    def num_accepted(self) -> int:
        return len(self.kept) - 1


def verify(sampling: list[Request], rows: list[SampleResult]) -> list[Verified]:
    """Group the step's sampling rows (a request with k drafts has k + 1 in a row) and cut each group
    at its first sample that differs from the draft it verifies."""
    out: list[Verified] = []
    i = 0
    while i < len(rows):
        request = sampling[i]
        drafts = request.spec_token_ids
        a = 0
        while a < len(drafts) and rows[i + a].token_id == drafts[a]:
            a += 1
        out.append(Verified(request, rows[i : i + a + 1], i + a))
        i += len(drafts) + 1
    return out
