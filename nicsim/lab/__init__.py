"""Labs: several guests on nicsim switches, their links, captures and checks, from one topology file.

``topology`` reads and checks a file (keys defined once in ``fields``; ``schema`` is the JSON Schema
made from them), ``plan`` turns it into what runs (names, MACs and addresses scoped by the lab's name,
each guest's workloads, each switch's ``nicsim serve`` command line), ``run`` runs it once, ``checks``
gives the verdict and ``report`` the table and JSON. ``nicsim lab`` (:mod:`nicsim.cli.lab`) is the
command line.
"""

from .topology import Topology, TopologyError, from_dict, load

__all__ = ["Topology", "TopologyError", "from_dict", "load"]
