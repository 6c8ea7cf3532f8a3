"""Cost model of the attention schedules, its calibration on this machine, and GPU projections.

The cost model itself is ``ringrt.schedules.costmodel`` (pure math; ``auto`` uses it at run time);
read ``cli.py`` (the ``ringrt simulate`` command), ``calibrate.py`` (measures this machine),
``anchors.py`` (the published measurements it must reproduce), ``project.py`` (8 to 1024 GPUs),
``overhead.py`` (per-call overhead of every schedule here), ``sharing.py`` (how compute slows when
the ranks of a node compute at once), ``links.py`` (emulated cluster links: each rank in a network
namespace of its own, tbf-shaped mesh / switch / ring; ``--link`` of ``calibrate`` and ``bench compare``).

A tool: may import any ringrt package; nothing but the command line (``ringrt.cli``) and the other
tools imports it (``tests/test_architecture.py``).
"""
