"""``python -m warden.guest``: see :func:`warden.guest.pid1.main`."""

from warden.guest.pid1 import main

main()
