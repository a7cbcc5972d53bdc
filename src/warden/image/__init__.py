"""Guest images: kernel, initramfs and rootfs, built from a recipe and kept in a
content-addressed cache. See :mod:`warden.image.build` and :mod:`warden.image.store`."""
