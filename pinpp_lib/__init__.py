"""PartImageNet++ reproduction kit."""
