"""Infrastructure every step uses: identities, atomic writes, locks, settings, Ray fan-out, faults."""
