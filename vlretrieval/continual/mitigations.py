"""The mitigations of forgetting `config.continual.mitigation` chooses among (docs/continual.md):
a module of its own so that the config checks can name them without importing the protocol."""

MITIGATIONS = ("finetune", "frozen_image_tower", "lwf")
