"""The drills of issue 11 (item 7): real daemons killed with SIGKILL at random moments, torn and damaged
checkpoints, a disk that fills up, a device that fails with EIO; each checks that what stated said was
durable survives, bit for bit against torch.optim.AdamW(fused=True). `make test` runs their bounded form
(20 kill cycles); `make drill` the long one (STATED_DRILL_KILLS cycles with a bigger paged job)."""
