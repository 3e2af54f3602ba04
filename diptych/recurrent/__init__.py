"""Backend-neutral recurrent-depth toolkit: depth schedules, exit criteria, generation, sweeps."""
