"""Resume: choosing the checkpoint to continue from and putting every piece of state back."""
