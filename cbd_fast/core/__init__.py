"""The label-free core: purify, its config, the contrastive attack, adversaries, clean terms,
inputs, checkpoints, distributed runs and progress. Never imports ``cbd_fast.evaluation`` or
``cbd_fast.app``: nothing here reads a label."""
