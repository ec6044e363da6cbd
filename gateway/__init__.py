"""The national portal (Flask): ``gateway.app:create_app()``."""
