"""Optional front ends for other platforms; each is imported only by its own entry point."""
