"""Data: data sets (embedded, synthetic, torchvision, image folders), the resumable sampler, loaders."""
