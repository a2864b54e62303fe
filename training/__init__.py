"""Ray Train jobs (DeepSpeed ZeRO-3 recipes): added with the training issue."""
