"""The storage layer everyone uses: locations (paths and URIs, pyarrow filesystems, whole-object
I/O, the storage key's checks) and atomic files and digests."""
