"""Drivers realise kinds on a host. They read and act; they never order or decide policy."""
