"""The step loop: requests in, `schedule() -> forward -> update` each step, outputs out."""
