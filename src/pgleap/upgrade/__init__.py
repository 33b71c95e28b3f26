"""The upgrade engine: phases, bulk copy, compatibility facts."""
