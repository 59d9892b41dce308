"""pullbackd: pull-mode backups of running libvirt domains, driven over varlink."""

__version__ = "0.1.0"
