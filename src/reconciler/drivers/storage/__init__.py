"""The storage driver: Volume on LVM (lvm2) and qcow2-file backends."""

from reconciler.drivers.storage._driver import StorageDriver
from reconciler.drivers.storage._file import FileBackend
from reconciler.drivers.storage._lvm import LvmBackend
from reconciler.drivers.storage._lvm2 import Lvm2

__all__ = ["FileBackend", "Lvm2", "LvmBackend", "StorageDriver"]
