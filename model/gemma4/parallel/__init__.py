"""Multi-device replicas: how a replica's ranks split the model (`layout`), the collectives they run
(`comm`), and where each MoE layer's experts live (`placement`)."""
