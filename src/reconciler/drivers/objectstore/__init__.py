"""The object store driver (Bucket): Swift through python-swiftclient, or any S3 endpoint
through boto3."""

from reconciler.drivers.objectstore._common import Found, Registry, Store
from reconciler.drivers.objectstore._driver import ObjectStoreDriver
from reconciler.drivers.objectstore._s3 import S3Store
from reconciler.drivers.objectstore._swift import SwiftStore

__all__ = ["Found", "ObjectStoreDriver", "Registry", "S3Store", "Store", "SwiftStore"]
