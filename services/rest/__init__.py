"""std-daq's REST admin interface (``stddaq-rest``)."""
