"""The mathematics: noise schedules and their losses (VP SDE, discrete SD, improved DDPM) and classifier-free
guidance. Pure functions of tensors and networks: nothing here reads configs, files or data."""
