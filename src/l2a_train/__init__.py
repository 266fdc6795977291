"""l2a-train: long-context continued pretraining with L2A layers."""
