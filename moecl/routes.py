"""Route ids: ``t >= 0`` is task t's router (or the one dense adapter, 0); :data:`ZERO_SHOT` is the plain CLIP.

One definition for the model, DDAS, the evaluator and prediction."""

ZERO_SHOT = -1  # the untouched backbone: no adapter on the path (the fine-tuned backbone under full-ft)
