"""HTTP service that Label Studio talks to (ML backend protocol), plus the `clipseg` command line."""
