"""disttrain.paramserver: parameter-server mode — servers own parts of the parameters and the optimizer,
workers pull, compute gradients with the ordinary training loop and push (docs/PARAMSERVER.md).

Modules (import what you need; nothing is imported here, so `disttrain` stays quick to start):
    protocol     the wire format: msgpack header + raw array frames, strict and bounded validation and receiving
    sharding     Layout: parameters cut into parts spread evenly over S servers
    consistency  async / ssp / sync rules and sync rounds
    membership   live workers, clocks, heartbeats, time-outs; what the server remembers of workers not live
    snapshot     atomic snapshot files
    rollback     undo of one optimizer update (an update that comes out non-finite)
    refusals     the server's log of refused messages (the first, then at most one an interval)
    alerts       what a server tells its operator beyond its log (failed snapshots), marked for ps-cluster
    throttle     Throttle: at most one report an interval, the others counted (refusals, alerts)
    auth         CURVE keys, ZAP on the servers, what each key name may do, the loopback-only insecure mode
    server       ParameterServer (one ROUTER socket, one thread)
    worker       PSClient (join, pull, push, heartbeats, reconnection)
    worker_mode  ParameterServerMode: the Trainer's mode on a worker (pull, push, the optimizer on the servers)
    job          a parameter-server job's servers and workers, built from a JobSpec
    cluster      Cluster: S servers + W workers as processes on this machine
    resume_check --resume: the servers (ps-cluster: their snapshots) must not be behind worker 0's checkpoint
    cli          ps-cluster, ps-server, ps-worker, ps-keys
"""
