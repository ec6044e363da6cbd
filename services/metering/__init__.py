"""metering: verifies, validates, deduplicates and rates data centres' usage."""
