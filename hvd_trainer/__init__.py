"""hvd-trainer."""
