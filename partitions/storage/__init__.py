"""Storage: disk images and the two ways a child reaches them (emulated IDE, synthetic SCSI)."""
