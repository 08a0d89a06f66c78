"""Topology files: one YAML file, in the Collector's vocabulary, drives every kotel process."""

from kotel.topology.errors import Issue, TopologyError
from kotel.topology.loader import load_topology, parse_topology
from kotel.topology.model import Topology

__all__ = ["Issue", "Topology", "TopologyError", "load_topology", "parse_topology"]
