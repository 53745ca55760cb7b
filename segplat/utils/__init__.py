"""Small helpers shared across segplat (atomic files, ranks, seeding)."""
