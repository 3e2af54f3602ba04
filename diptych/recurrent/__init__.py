"""Backend-neutral recurrent-depth toolkit: schedules, truncation plans, exit criteria, sweeps."""
