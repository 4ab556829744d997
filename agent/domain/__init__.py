"""Pure types and rules: no I/O, no third-party imports beyond the standard library."""
