"""Train task: incremental fine-tuning of the NLB U-Net on the datastore's labels."""
