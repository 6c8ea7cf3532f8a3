"""Everything that talks to other processes: the one place ``torch.distributed`` is used for traffic.

``comm.py`` owns all point-to-point traffic (channels, packing, timeouts, byte counters) and the
bounded collectives; ``collectives.py`` the all-gather / reduce-scatter / all-to-all the schedules
use; ``groups.py`` the process groups a schedule needs (dedicated direction groups on NCCL);
``agree.py`` the input checks every rank agrees on before any transfer; ``launcher.py`` joining a
job (torchrun, Slurm, mpirun); ``device.py`` which device a rank computes on; ``spawn.py`` local
CPU ranks in one command (the demo, benchmarks and tests).

May import: ``ringrt.ops`` and the standard library / torch. Never the schedules, models or jobs.
"""
