"""Placeholder ids that Ovis2.5 puts into `input_ids` besides the tokenizer's own ids.

Negative so they can never collide with a vocabulary entry; the model swaps them for visual
embeddings before the LLM runs (see `litovis.model.ovis`).
"""

IMAGE_TOKEN_ID = -200  # one per image in a prompt, before expansion
VIDEO_TOKEN_ID = -201  # one per video in a prompt, before expansion
VISUAL_ATOM_ID = -300  # one per 2x2 block of ViT patches, after expansion
IMAGE_START_ID = -301  # -> VTE row visual_vocab_size - 4
IMAGE_END_ID = -302  # -> VTE row visual_vocab_size - 3
VIDEO_START_ID = -303  # -> VTE row visual_vocab_size - 2
VIDEO_END_ID = -304  # -> VTE row visual_vocab_size - 1

INDICATOR_IDS = (IMAGE_START_ID, IMAGE_END_ID, VIDEO_START_ID, VIDEO_END_ID)
IGNORE_INDEX = -100  # label value that contributes no loss
