"""Everything that talks to other processes: the one place ``torch.distributed`` is used for traffic.

Read first: ``comm.py`` (all point-to-point traffic: channels, packing, timeouts, byte counters, and
the bounded collectives), ``groups.py`` (the process groups a schedule needs: its two lanes, dedicated
communicators on NCCL), ``launcher.py`` (joining a job under torchrun, Slurm or mpirun: the launcher facts
live here). Then ``collectives.py`` (the all-gather / reduce-scatter / all-to-all the schedules use),
``agree.py`` (the input checks every rank agrees on before any transfer, once per signature), ``device.py`` (which device
a rank computes on), ``spawn.py`` (local CPU ranks in one command: the demo, benchmarks and tests).

May import: ``ringrt.ops``, torch and the standard library. Never the schedules, models, jobs or tools.
"""
