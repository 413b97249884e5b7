"""The benchmark harness (``make bench``): ``python -m tests.bench.run``.

Not part of the test suite: no module here is named ``test_*`` and none holds a test
function, so pytest's default run collects nothing from this package.

    settings.py  knobs read from the environment (BENCH_IMAGE_MB, BENCH_REPS, ...)
    images.py    4-layer images of incompressible random data, built as files and pushed
    peers.py     the processes: our mirror, distribution's proxy mode (the peer), nginx
    wan.py       the WAN profile: a network namespace, a veth pair and an htb class
                 between the upstream and everything else
    measure.py   timers, skopeo/curl/wrk runners, upstream byte accounting, RSS sampler
    verifier.py  a process doing only a verifying cache's work (sha256, write, fsync),
                 run beside a direct pull in the cold phase
    fleet.py     the fleet phase: 3 replicas behind haproxy against the one mirror
    report.py    the table of ratios, the pass/fail targets and the JSON file
    run.py       the entry point that starts everything and runs the phases
"""
