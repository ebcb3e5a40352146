module toktra.test/goclient

go 1.19
