"""Cost model of the attention schedules, its calibration on this machine, and GPU projections.

``costmodel`` is pure math (no torch.distributed); ``calibrate`` measures this machine; ``cli`` is
the ``ringrt simulate`` command (calibrate, check the published anchors, project to large clusters).
"""
