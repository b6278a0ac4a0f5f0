use super::*;

#[test]
fn probe() {
    let cases = [
        "[daemon]\ninterface = \"eth0\"\nfoo = 1\n",
        "foo = 1\n[daemon]\ninterface = \"eth0\"\n",
        "[daemon]\ninterface = \"eth0\"\n[[service]]\nname = \"a\"\nvip = \"1.2.3.4:80\"\n\n[[service.backend]]\nname = \"x\"\naddress = \"1.2.3.5:80\"\n",
        "[daemon]\ninterface = \"eth0\"\n[[service]]\nname = \"a\"\nvip = \"1.2.3.4:80\"\nsnat = \"1.1.1.1\"\n\n[[service.backend]]\nname = \"x\"\naddress = \"1.2.3.5:80\"\nweight = -1\n",
        "[daemon]\ninterface = \"eth0\"\nxdp_mode = \"bogus\"\n",
        "[daemon]\ninterface = [\"eth0\", 3]\n",
        "[daemon]\ninterface = 3\n",
        "[daemon]\nxdp_mode = \"skb\"\n",
        "[daemon]\ninterface = \"eth0\"\n[[service]]\nname = \"a\"\nvip = \"1.2.3.4:80\"\nsnat = \"1.1.1.1\"\nforwarding = \"dsr\"\n",
        "[daemon]\ninterface = \"eth0\"\n[[service]]\nname = \"a\"\nvip = \"1.2.3.4:80\"\nsnat = \"1.1.1.1\"\n\n[[service.backend]]\nname = \"x\"\naddress = \"1.2.3.5:80\"\nbogus = 1\n",
        "",
        "[daemon\n",
        "daemon = { interface = \"eth0\", bogus = 1 }\n",
    ];
    for c in cases {
        match Config::parse(c, "t.toml") {
            Ok(_) => eprintln!("OK"),
            Err(e) => eprintln!("{e}"),
        }
    }
}
