"""Twin cores, one kind per module (each registers itself with ``neurotwin.training.parts``)."""
