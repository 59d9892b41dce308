"""pullbackd: pull-mode backups of libvirt domains, driven over varlink."""

__version__ = "0.1.0"
