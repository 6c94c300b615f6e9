"""Everything about process groups, devices and the torchrun environment lives here."""
