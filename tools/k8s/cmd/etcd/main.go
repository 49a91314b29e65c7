// Command etcd is go.etcd.io/etcd/server/v3's etcd server, built from module form.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
