"""The runtime layer: starting and quieting Ray, devices and memory, the cluster's node types and
capacity, placement labels, fault points for tests."""
