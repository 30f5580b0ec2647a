"""NegShapes: the fine-tuning that learns negation there (README, "What it takes to learn
negation here"; the demo's `--recipe negshapes_learns_negation`, which pretrains the
stand-in it starts from).

Every text layer at peak rate 3e-4, gradients clipped to global norm 1, 1200 steps; every
presence example image-hard (image A+Y: "A, no X" true, "A, no Y" false; distractor image
A+X), half of them affirmed ("A and Y" true, "A and X" false); the objective is the four
2-way choices of (image, distractor) x (true, false text) (`paired_choices`), with no
absence stream.
"""

from negclip_jax.configs import demo


def get_config():
  c = demo.get_config()
  c.layers = "whole"
  c.learning_rate = 3e-4
  c.grad_clip_norm = 1.0
  c.total_steps = 1200
  c.objective = "paired_choices"
  c.lambda_stage2 = 0.0
  c.data.negshapes_image_hard_fraction = 1.0
  c.data.negshapes_image_hard_affirmed_fraction = 0.5
  return c
