"""Local transports: the microphone and speakers of this machine."""
