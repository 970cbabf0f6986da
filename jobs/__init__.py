"""geopeft.jobs: the `geopeft train` and `geopeft compare` jobs (configs, data, models,
training loop, reports).

Not imported by `import geopeft`: the CLI imports it when a job runs, and it is the only
place that imports omegaconf, transformers, timm, matplotlib and tqdm.
"""
