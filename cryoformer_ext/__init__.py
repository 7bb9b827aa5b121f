"""The job layer shared by the ``cryoformer`` command and the RELION and cryoSPARC adapters.

``commands/`` (one module per subcommand) -> ``job/`` (train, encode, analyse one job; worker launch) ->
``analysis/`` (what a job makes of the latents) and ``formats/`` (every file format) -> the engine
``cryoformer``. Beside them: ``config.py`` (the job parameters), ``failures.py`` (one message per failure a
user can fix), ``jobdir.py`` (the names inside a job folder). See docs/ARCHITECTURE.md.
"""
