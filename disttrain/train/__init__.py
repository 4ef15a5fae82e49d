"""disttrain.train: the one training loop every mode uses (job spec -> model, data, optimizer, mode)."""
